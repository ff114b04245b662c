"""The commands behind ``aiayn COMMAND``: each turns its parsed flags into typed arguments,
calls the library, and prints what the command reports.

    prepare.py    aiayn prepare                 -> aiayn.data.prepare
    train.py      aiayn train, average, plot    -> aiayn.train
    translate.py  aiayn translate               -> aiayn.translator (and the search options)
    evaluate.py   aiayn evaluate                -> aiayn.evaluate
    shortlist.py  aiayn shortlist               -> aiayn.inference.shortlist
    attention.py  aiayn attention               -> aiayn.attention
    export.py     aiayn export                  -> aiayn.export
    importing.py  aiayn import                  -> aiayn.pretrained
    serve.py      aiayn serve                   -> aiayn.serve
    demo.py       aiayn demo                    -> aiayn.demo

`aiayn.cli` parses; nothing in the library imports this package or argparse.
"""
