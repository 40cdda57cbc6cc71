"""The overinterpretation pipeline: train → backselect → subsets → retrain → sis → controls → report.

``run_pipeline(config, workdir)`` (``runner.py``) runs the stages listed in
``config.stages``; each stage is a module with one job, and everything it
computes is cached in the work directory (atomic, validated files), so a
killed run re-run with the same command resumes and ends with the same report.
"""
