"""synlb: a SYN-only NFQUEUE load balancer with Maglev hashing for keepalived
(VRRP) routers. The layers of the package: docs/ARCHITECTURE.md."""


def __getattr__(name: str):
    # ``synlb.__version__`` from the package metadata, read only when asked:
    # every NFQUEUE worker imports this package and must start fast.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("synlb")
        except PackageNotFoundError:
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
