"""Every built-in component, imported explicitly.

Registration happens at import, so listing the modules here means a built-in name can never be
missing from the registry because of import order.
"""

import rex.data.tasks  # noqa: F401  (task/...)
import rex.engine.optim  # noqa: F401  (optim/..., sched/...)
import rex.eval.evaluators  # noqa: F401  (eval/ranking, eval/click)
import rex.eval.generative  # noqa: F401
import rex.eval.metrics  # noqa: F401
import rex.eval.reconstruction  # noqa: F401
from rex.components.attention import cross, target  # noqa: F401
from rex.components.clustering import kmeans  # noqa: F401
from rex.components.denoisers import conditional, schedule, synergy  # noqa: F401
from rex.components.embeddings import field  # noqa: F401
from rex.components.encoders import hierarchical, mlp, modality_table, sim_bucket, transformer  # noqa: F401
from rex.components.experts import bank  # noqa: F401
from rex.components.gates import fdaf, router  # noqa: F401
from rex.components.interactions import fm  # noqa: F401
from rex.components.losses import (  # noqa: F401
    classification,
    contrastive,
    decouple,
    diffusion,
    generative,
    reconstruction,
)
from rex.components.models import ctr, diff_msin, dmae, dmgin, m3bsr, rqvae, sequential, tiger  # noqa: F401
from rex.components.quantizers import residual  # noqa: F401
