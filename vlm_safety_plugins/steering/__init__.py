"""Residual-stream machinery shared by steering defenses: interventions applied by forward
hooks, read-outs of the last prompt token, calibration helpers, the artifact format and
anchor files. A steering defense's own maths lives in its folder under ``defenses/``."""
