"""Jobs: the record, one declaration per kind, the store, the fair queue, the scheduler, how one job runs
on a pipeline, and the server's library of past tracks. Imports mtm_bot.core and mtm_bot.stages."""
