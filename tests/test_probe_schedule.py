"""tools.probe_schedule's trajectories (CPU): the morph between two draws of a family, and a short run."""

import torch

from tools import probe_schedule
from tools.probe_schedule import Morph


def _draws():
    gen = torch.Generator().manual_seed(0)
    first = tuple(torch.randn(1, 2, 64, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    second = tuple(torch.randn(1, 2, 64, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    return first, second


def test_morph_starts_at_the_first_draw_and_ends_at_the_second():
    first, second = _draws()
    morph = Morph(first, second, steps=4, drift=0.0, gen=torch.Generator().manual_seed(1))
    for step, want in ((0, first), (4, second), (9, second)):
        got = morph.at(step)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=0)
    halfway = morph.at(2)[0].float()
    assert not torch.allclose(halfway, first[0].float(), atol=0.1)
    assert not torch.allclose(halfway, second[0].float(), atol=0.1)


def test_morph_adds_the_random_walk_to_q_and_k_only():
    first, second = _draws()
    morph = Morph(first, first, steps=1, drift=0.5, gen=torch.Generator().manual_seed(1))
    q, k, v = morph.at(1)
    assert (q.float() - first[0].float()).abs().max() > 0.1
    assert (k.float() - first[1].float()).abs().max() > 0.1
    torch.testing.assert_close(v, first[2])


def test_a_short_morphing_trajectory_judges_every_schedule(capsys):
    probe_schedule.main(["--grid", "2x16x24", "--heads", "1", "--steps", "4", "--dense-steps", "1",
                         "--densities", "0.1", "--families", "window2d", "--morph", "3",
                         "--schedules", "warm-up + sparse /20", "warm-up + sparse 4,20", "warm-up + sparse ramp /20"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("window2d")]
    assert len(lines) == 3
    for line in lines:
        mean = float(line.split("mean x")[1].split()[0])
        assert 0.5 < mean < 20
    # The ramp refreshes on sparse steps 1 and 2 of the three; the others not at all.
    assert "in 2 refreshes" in lines[2]
    assert "refreshes" not in lines[0]


def test_a_missed_mass_schedule_reports_where_it_refreshed(capsys):
    """refresh_on_missed_mass as a probe schedule: heads turning into another draw lose mass from the
    first mask, and the refresh comes on a step after a reading (never on sparse step 0 or 1: the
    first reading is the reference), listed on the line."""
    probe_schedule.main(["--grid", "2x16x24", "--heads", "1", "--steps", "6", "--dense-steps", "1",
                         "--densities", "0.1", "--families", "window2d", "--morph", "4",
                         "--schedules", "warm-up + sparse /20 missed 1.5"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("window2d"))
    steps = [int(s) for s in line.split("on missed mass: sparse steps [")[1].split("]")[0].split(",") if s.strip()]
    assert steps and all(2 <= s <= 4 for s in steps)
    assert f"in {len(steps)} refreshes" in line  # no scheduled refresh within 5 sparse steps
