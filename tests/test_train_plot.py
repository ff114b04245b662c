"""Loss and BLEU curves of a run (aiayn.train.plot)."""

from __future__ import annotations


def test_plot_writes_a_png(copy_run, tmp_path):
    from aiayn.cli import main

    png = tmp_path / "curves.png"
    assert main(["plot", str(copy_run.out_dir), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
