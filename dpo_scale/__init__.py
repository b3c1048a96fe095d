"""dpo_scale: Direct Preference Optimization from one CPU to multi-node GPU clusters.

Kept free of heavy imports: `import dpo_scale.loss` needs only torch.
"""

__version__ = "0.1.0"
