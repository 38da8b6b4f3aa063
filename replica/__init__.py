"""One replica: pure scheduling policies, cost profiles and the simulated engine."""

from replica import native as _native

_native.install()  # the compiled modules, if built from the current sources (replica.native)
