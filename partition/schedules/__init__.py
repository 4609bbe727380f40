"""Pipeline schedules as data: names (`names`), per-rank action lists (`actions`), their checks
(`check`), a simulated clock (`simulate`) and Gantt charts (`gantt`). No process is needed for
any of it: the runtime in `pipeline` executes the same action lists."""
