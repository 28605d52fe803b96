from fgcupy import demo


def test_demo_without_gpu_says_so_and_runs_the_reference(monkeypatch, capsys):
    monkeypatch.setattr(demo, "kernels_can_run", lambda: False)
    assert demo.main([]) == 0
    text = capsys.readouterr().out
    assert "kernels cannot run here" in text
    assert "relative L2 vs dense attention" in text
