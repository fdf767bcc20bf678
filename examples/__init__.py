"""zmqfed's examples, as a regular package.

A regular package, not a namespace one: Opacus 1.6 (the ``dp`` extra)
installs a top-level ``examples`` package of its own into site-packages,
which would otherwise shadow this directory (docs/privacy.md). With this
file, ``examples.digits`` resolves here whenever the repository comes first
on ``sys.path`` (``python -m``, ``zmqfed-sim`` and the tests all put it there).
"""
