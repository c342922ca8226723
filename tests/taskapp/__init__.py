"""An installed app whose ``tasks`` module holds tasks of Django's task framework, found by
carrot's autodiscovery (it is not in CARROT['task_modules'])."""
