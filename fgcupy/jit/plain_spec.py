"""The spec shape of a kernel with one specialization (no template arguments)."""

from __future__ import annotations


class PlainKernelSpec:
    """A kernel compiled once per architecture: its name is its template's, with no extra
    options and no dynamic shared memory. Subclasses set ``source``, ``template``,
    ``threads``, ``params`` and ``constants`` (and ``shared_params`` where a file holds
    several kernels)."""

    extra_options = ()
    smem_bytes = 0

    @property
    def name(self) -> str:
        return self.template.rsplit("::", 1)[-1]

    @property
    def name_expression(self) -> str:
        return self.template
