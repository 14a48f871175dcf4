"""Calibration: measured records -> fitted coefficients, and validation of the estimator against them.

pandas + scipy + matplotlib; imports ``estimator``, never ``harness`` or torch. Modules:
``data`` (records -> DataFrame with the estimator's exact terms), ``fit`` (``StructuredModel`` over
``estimator.estimate.predict_parts``, ``SeedFormula``, ``WeightsTimes``), ``validate`` (metrics,
subgroups, leave-one-model-out), ``report`` (report.md/html + figures), ``cli`` (``vramcal calibrate``,
``vramcal validate``).
"""
