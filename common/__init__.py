"""Plumbing shared by the numbered lessons: toy models, synthetic data, devices, timing, runs.

Nothing in here is the lesson itself. A reader may copy one numbered script plus this package.

Checkpoint keys used by every script (one vocabulary across the collection)
---------------------------------------------------------------------------
A training checkpoint is a plain ``dict`` whose keys say what they hold:

``model``        the model's ``state_dict()`` (parameters and buffers)
``optimizer``    the optimizer's ``state_dict()`` (``state`` + ``param_groups``)
``scheduler``    the LR scheduler's ``state_dict()``, when there is one
``scaler``       the ``torch.amp.GradScaler`` ``state_dict()``, when AMP is on
``epoch``        the NEXT epoch to run: a resume starts ``for epoch in range(ckpt["epoch"], ...)``
                 so it never repeats nor skips one
``step``         optimizer steps taken so far
``metrics``      a dict of the latest figures (``{"train_loss": ..., "val_loss": ...}``)
``history``      per-epoch metrics so far (a list of dicts), so a resumed run can plot them all
``rng``          random-number-generator states, for a bit-exact resume
``data``         where the data stream stands inside the epoch ``epoch`` (02's step-level
                 checkpoints): batches done, the loader's ``state_dict()``, the epoch's
                 running loss; a checkpoint written at an epoch end may leave it out
``config``       plain hyperparameters (ints, floats, strings) needed to rebuild the model

See ``common.training.CHECKPOINT_KEYS``.
"""
