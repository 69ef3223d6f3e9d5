"""Ray Tune programs over the pro-VLAE trainer.

- ``grid``      the study as a declarative product of axes (datasets x families x betas x seeds) + presets
- ``cli``       argument parsing and error reporting shared by the sweep scripts
- ``tracking``  the MLflow contract: one parent run per sweep, exactly one child run per trial
- ``trainable`` the thin Tune function trainables: one trial (config dict -> TrialConfig -> Trainer), or a
                fused group of trials (-> FusedTrainer), each trial its own MLflow run
- ``launch``    Ray start-up, Tuner creation or restore, and the end-of-sweep summary
- ``search``    an adaptive search (Optuna TPE + ASHA) over one family and dataset, seeds as one
                fused group

Scripts: ``sweeps/full_grid.py`` (the paper's grid), ``sweeps/optuna_search.py`` (the best β, γ,
fade-in length and lr for one family and dataset).
"""
