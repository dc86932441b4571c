"""Hardware classes (one YAML per class) and their schema.

The foundation ships none yet: the agent's config carries the power figures its estimate needs
(``power.idle_w``, ``power.active_w_per_core``) and its ``device_class`` name. The profiles
with sourced facts and the selection that uses them arrive with the device-profiles issue.
"""
