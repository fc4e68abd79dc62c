"""Evaluation pieces the evaluate / report / predict stages put together (no params.yaml here); inference
on one image and the val loop are components.learning.segment.

Modules (import what you need; importing this package stays light, no torch / mlflow / matplotlib):
  loading     a checkpoint as a network ready for inference (evaluate and predict)
  speed       fps as the seed measures it, the device and dtype it was measured on
  visualize   palette colouring, overlays, image | ground truth | prediction panels, charts (Agg)
  registry    the model as MLflow artifacts (state_dict + build config), registry aliases, model refs
  table       the published results table (committed copy) and markdown tables
"""
