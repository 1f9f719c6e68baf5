"""Audits: do two exports of one network compute and explain alike? Layer matching and map agreement
(compare); the stdout table, JSON and HTML page (report)."""

from .compare import AuditResult, Tolerances, audit, pearson, ssim, top_iou, unit_scaled

__all__ = ["audit", "AuditResult", "Tolerances", "pearson", "ssim", "top_iou", "unit_scaled"]
