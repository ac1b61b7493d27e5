"""torpor's Kubernetes operator: TrainingJobs that survive drains, spot reclaims and restarts.

Functional core, imperative shell. The pure modules (``spec``, ``settings``, ``naming``,
``builders``, ``pods``, ``observing``, ``outcomes``, ``reconciling``) hold every decision and
import neither kopf nor the Kubernetes client, nor torch; the kopf handlers only observe, call
:func:`torpor_operator.reconciling.decide` and apply the :class:`~torpor_operator.reconciling.Decision`.
"""
