from stagewise.domains.base import Domain, build_domain, split_items  # noqa: F401
