"""Logical axis names, the mesh built from the config, and sharding helpers.

Parameters carry logical axis names (the constants below) via `nn.with_logical_partitioning`;
activations are constrained at block boundaries with `nn.with_logical_constraint`. A rules table
in the config maps each logical name to mesh axes ('data', 'fsdp', 'tensor').
"""

# Logical axis names used by the model. Parameter axes:
EMBED = "embed"        # model width of weights: sharded over fsdp
MLP = "mlp"            # MLP hidden: sharded over tensor
HEADS = "heads"        # attention query heads: sharded over tensor
KV_HEADS = "kv_heads"  # attention key/value heads: sharded over tensor
HEAD_DIM = "head_dim"  # per-head width: replicated
VOCAB = "vocab"        # vocabulary: sharded over tensor
POSITIONS = "positions"  # learned position table rows: replicated
LAYERS = "layers"      # stacked layers (scan): replicated
# Activation axes:
BATCH = "batch"        # batch: sharded over data and fsdp
LENGTH = "length"      # sequence: replicated
ACT_EMBED = "act_embed"  # model width of activations: replicated
