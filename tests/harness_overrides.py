"""Overrides the harness tests share (imported by name, like engine_models)."""

#: The deploy-latency stage at the task's own size, one setting, one iteration: exercised by every harness
#: test run without a 224x224 twin (tests/test_runtimes.py times a twin).
DEPLOY_FAST = ("task.deploy_size=null", "run.deploy_batches=[1]", "run.deploy_threads=[1]", "run.deploy_iters=1")
