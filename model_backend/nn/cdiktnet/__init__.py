"""CDIKTNet (Chen et al., 2025): the model, its losses and its unpaired-learning machinery.

- `CDIKTNet`: shared backbone + CDIS heads; `model(x)` is the retrieval embedding,
  `model(drone, sat)` the training outputs (`CDISOutput`) that `CDISLoss` consumes.
- CDTS: `make_pseudo_labels` (Jaccard + DBSCAN per view, or shared-space voting) and
  `CDTSMemory` (cluster memories, dual path or shared) for images nobody paired.
- `save_inference_weights`: the backbone alone, in the safetensors format `EmbeddingModel` loads.

Torch-only, no Qt. Nothing here downloads weights.
"""

from model_backend.nn.cdiktnet.backbone import DEFAULT_BACKBONE, Backbone, build_backbone, default_backbone_state
from model_backend.nn.cdiktnet.cdis import (
    ARCHITECTURE,
    CDIKTNet,
    CDISOutput,
    ClassifierHead,
    InferenceNet,
    MultiDilationBlock,
    SpatialAlignment,
    load_inference_net,
    save_inference_weights,
)
from model_backend.nn.cdiktnet.cdts import (
    CDTSConfig,
    CDTSLossResult,
    CDTSMemory,
    ClusterMemory,
    PseudoLabels,
    cluster_centroids,
    cross_view_labels,
    embed_with_flip,
    make_pseudo_labels,
)
from model_backend.nn.cdiktnet.clustering import (
    apply_anchor_groups,
    cluster_view,
    compact_labels,
    dbscan,
    jaccard_similarity,
    knn,
    vote_satellite_labels,
)
from model_backend.nn.cdiktnet.losses import (
    CDISLoss,
    CDISLossConfig,
    CDISLossResult,
    alignment_loss,
    heads_cross_entropy,
    symmetric_info_nce,
)

__all__ = [
    "ARCHITECTURE", "DEFAULT_BACKBONE", "Backbone", "CDIKTNet", "CDISLoss", "CDISLossConfig", "CDISLossResult",
    "CDISOutput", "CDTSConfig", "CDTSLossResult", "CDTSMemory", "ClassifierHead", "ClusterMemory", "InferenceNet",
    "MultiDilationBlock", "PseudoLabels", "SpatialAlignment", "alignment_loss", "apply_anchor_groups",
    "build_backbone", "cluster_centroids", "cluster_view", "compact_labels", "cross_view_labels", "dbscan",
    "default_backbone_state", "embed_with_flip", "heads_cross_entropy", "jaccard_similarity", "knn",
    "load_inference_net", "make_pseudo_labels", "save_inference_weights", "symmetric_info_nce",
    "vote_satellite_labels",
]
