"""The namespace lab: test hosts for lbd built from network namespaces, veths and bridges.

Used by the namespace tests and by ``make lab``. Nothing here touches the root namespace
beyond creating and deleting the namespaces themselves.
"""
