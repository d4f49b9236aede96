"""The transfer strategies: what ``train.strategy`` can be, and what the transfer-learning study compares.

Training from scratch is not a ``train.strategy`` (it is ``model.pretrained: none``), but the study runs it
as its reference, so its list is :data:`SCRATCH` followed by :data:`STRATEGIES`.
"""

#: ``train.strategy`` values: backbone frozen; everything learns; backbone stages unfrozen from the top.
STRATEGIES = ("feature_extraction", "finetune", "gradual")
#: the study's name for ``model.pretrained: none`` with ``finetune``
SCRATCH = "scratch"
#: what the study runs, in the order its tables and figures list them
STUDY_STRATEGIES = (SCRATCH, *STRATEGIES)
#: how reports name them
LABELS = {SCRATCH: "scratch", "feature_extraction": "feature extraction", "finetune": "fine-tuning",
          "gradual": "gradual unfreezing"}
