"""`aiayn demo` (aiayn.demo) end to end on a small copy dataset instead of the LibreOffice corpus:
it translates with the search its checkpoint records, and its advice runs anywhere."""

from __future__ import annotations

from helpers import REPO, SMALL_COPY, TINY, prepare_synthetic

# configs/libreoffice-small.yaml made tiny and short, on the update count instead of the clock.
DEMO = TINY + ["train.max_minutes=0", "train.max_updates=4", "train.save_every_minutes=0", "train.save_every=2",
               "train.valid_every_minutes=0", "train.valid_every=0", "train.valid_bleu_sentences=5",
               "train.average_last=2", "train.keep_last=2", "train.batch_tokens=300", "train.warmup=2",
               "search.alpha=0.9"]


def test_the_demo_translates_with_the_checkpoints_search_and_its_advice_runs_anywhere(tmp_path, monkeypatch, capsys):
    import aiayn.data as data_mod
    import aiayn.translator as translator_mod
    from aiayn.config import SearchConfig
    from aiayn.demo import run_demo

    def prepare_dataset(options):  # the demo's corpus is downloaded; a small copy task stands in for it
        prepare_synthetic(options.out, "copy", *SMALL_COPY)

    searches = []

    class Recorded(translator_mod.Translator):
        def __init__(self, ckpt, *args, search=None, **kwargs):
            searches.append((search, ckpt.search))
            super().__init__(ckpt, *args, search=search, **kwargs)

    monkeypatch.setattr(data_mod, "prepare_dataset", prepare_dataset)
    monkeypatch.setattr(translator_mod, "Translator", Recorded)
    work = tmp_path / "demo"
    summary = run_demo(work, list(DEMO))
    assert searches == [(SearchConfig(beam=4, alpha=0.9), SearchConfig(beam=4, alpha=0.9))]
    assert (summary["beam"], summary["alpha"]) == (4, 0.9)

    printed = capsys.readouterr().out
    advice = printed[printed.index("Go on:"):]
    lines = [line for line in advice.splitlines()[1:] if line.strip()]
    assert len(lines) == 5 and all(" aiayn " in line for line in lines)  # the command on PATH
    assert ".venv" not in advice and str(REPO) not in advice  # nothing of the checkout the demo ran from
    assert advice.count("--config libreoffice-small ") == 2
    assert f"aiayn translate --checkpoint {(work / 'train/averaged').resolve()}" in advice

