import replica  # noqa: F401  (its compiled modules, loadtest.simulate.replica among them: replica.native)
