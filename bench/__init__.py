"""flipad's benchmarks, one module each, run by ``python -m bench`` (see :mod:`bench.report`).

    python -m bench --list            what each benchmark measures
    python -m bench NAME [ARGS ...]   one benchmark at its full size (ARGS: its own options)
    python -m bench NAME --quick      the same, small (seconds to minutes)
    python -m bench all [--quick]     every benchmark; docs/benchmarks.md is regenerated at the end

Each benchmark writes its figures as JSON beside the doc (``docs/benchmarks/NAME.json``, or
``NAME.quick.json`` for a quick run) and the doc is rebuilt from those files, so no figure is
copied by hand. Shared scaffolding (the generator zoo, the core-bar generators, cached training,
sample sets) is :mod:`bench.common`.
"""
