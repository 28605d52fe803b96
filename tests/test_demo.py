from fgcupy import demo


def test_demo_without_gpu_says_so_and_runs_the_reference(monkeypatch, capsys):
    monkeypatch.setattr(demo, "cupy_available", lambda: False)
    assert demo.main([]) == 0
    text = capsys.readouterr().out
    assert "No CUDA GPU found" in text
    assert "relative L2 vs dense attention" in text
