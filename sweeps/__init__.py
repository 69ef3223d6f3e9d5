"""Ray Tune programs over the pro-VLAE trainer.

- ``grid``      the study as a declarative product of axes (datasets x families x betas x seeds) + presets
- ``cli``       argument parsing (``SweepOptions``, parsed once) and error reporting shared by the scripts
- ``tracking``  the MLflow contract: one parent run per sweep, exactly one child run per trial
- ``lifecycle`` one Tune trial's life, shared by every trainable: prologue, runs, restore (with the
                fallback to the older checkpoint), flush-then-checkpoint, figures, failing
- ``trainable`` the grid's thin trainables: one trial (-> Trainer), or a fused group (-> FusedTrainer)
- ``driver``    the one sweep driver: checks, lease, Ray, parent run, Tuner, an outage-proof end
- ``launch``    the grid's part: manifest, Tuner, summary, study report
- ``eta``       the line under each status table: trials finished / running / pending, images, expected end
- ``search``    an adaptive search (Optuna TPE + ASHA) over one family and dataset: its manifest and
                Tuner (``search_space``: the spec; ``search_trainable``: one configuration's seeds as one
                fused group; ``search_summary``: the table, the best, the study)

Scripts: ``sweeps/full_grid.py`` (the paper's grid), ``sweeps/optuna_search.py`` (the best β, γ,
fade-in length and lr for one family and dataset).
"""
