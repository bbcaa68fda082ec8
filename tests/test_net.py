"""The trusted client address and the allow-lists of operator endpoints (net.py)."""
from __future__ import annotations

import pytest

from meetinity_gateway.net import (
    DEFAULT_ALLOW,
    address_allowed,
    client_allowed,
    parse_networks,
)


def test_parse_networks_accepts_addresses_and_ranges():
    networks = parse_networks(["10.0.0.0/8", " ::1 ", "192.168.1.7", "10.1.2.3/8"])
    assert [str(n) for n in networks] == ["10.0.0.0/8", "::1/128", "192.168.1.7/32",
                                          "10.0.0.0/8"]


@pytest.mark.parametrize("bad", ["everyone", "10.0.0.0/33", "", "1.2.3.4/8/9"])
def test_parse_networks_names_the_bad_item(bad):
    with pytest.raises(ValueError) as info:
        parse_networks(["127.0.0.1", bad])
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("address, allowed", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:10.0.0.5", True),
    ("172.31.255.255", True), ("172.32.0.1", False), ("fd00::1", True), ("8.8.8.8", False),
    ("2001:db8::1", False), ("", False), ("localhost", False), ("127.0.0.1%lo", False),
])
def test_default_allow_list(address, allowed):
    assert address_allowed(address, parse_networks(DEFAULT_ALLOW)) is allowed


def test_client_allowed_uses_the_trusted_address_only():
    networks = parse_networks(["127.0.0.0/8"])
    spoofed = {"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "127.0.0.1"}
    assert not client_allowed(spoofed, networks, 0)
    assert client_allowed(spoofed, networks, 1)  # only when that hop is trusted
    assert not client_allowed({"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": "8.8.8.8"},
                              networks, 1)
    assert not client_allowed({}, networks, 0)
