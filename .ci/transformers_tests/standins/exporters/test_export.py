"""Stand-in for `tests/exporters/test_export.py`, which the transformers sdist does not ship.

`ModelTesterMixin` subclasses `ExportTesterMixin`; upstream its tests export models with torch.export, ONNX,
OpenVINO, ... and are all `@slow`, so the unit suite never runs them. The mixin is empty here: export of modsquad
models is tested by the package's own tests.
"""


class ExportTesterMixin:
    pass
