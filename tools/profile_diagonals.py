"""What diagonals cost: default predictions (top-k 0.1 and 0.3) with 0, 2, 4 and 8 diagonals at
whole frames of wan14b-480p (40 heads, 32,760 tokens, video-like "mixed" inputs), and
find_diagonals itself, as queued medians beside SDPA cuDNN in the same run (GPU):

    PYTHONPATH=. python -m tools.profile_diagonals
"""

from fgcupy import find_diagonals, predict_mask
from tools.scoring_setup import queued_ms, scoring_setup


def main() -> None:
    setup = scoring_setup()
    q, k = setup.q, setup.k
    frame = setup.shape.grid[1] * setup.shape.grid[2]
    print("diagonals found on these inputs:", find_diagonals(q, k, 128))
    sets = {n: tuple(sign * j * frame for j in range(1, n // 2 + 1) for sign in (-1, 1)) for n in (0, 2, 4, 8)}
    for density in (0.1, 0.3):
        cells = []
        for n, diagonals in sets.items():
            ms = queued_ms(lambda: predict_mask(q, k, 128, "topk", density=density, diagonals=diagonals))
            cells.append(f"{n} diagonals {ms:.3f} ms = {100 * ms / setup.dense_ms:.1f} %")
        print(f"d={density} (SDPA cuDNN {setup.dense_ms:.2f} ms): " + " | ".join(cells), flush=True)
    ms = queued_ms(lambda: find_diagonals(q, k, 128))
    print(f"find_diagonals {ms:.3f} ms = {100 * ms / setup.dense_ms:.1f} %")


if __name__ == "__main__":
    main()
