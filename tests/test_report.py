"""The environment probe reads the NVIDIA driver version from the kernel module's banner."""

from __future__ import annotations

import pytest

from mxlora.report.writer import parse_nvidia_driver


@pytest.mark.parametrize(
    ("banner", "version"),
    [
        # The H100 machine's open kernel module (seen on the device): "for x86_64" comes first.
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  "
            "Release Build  (dvs-builder@U22-I3-AE18-09-1)  Thu Jul 31 2025\n"
            "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n",
            "580.159.04",
        ),
        # The proprietary module's banner.
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023\n",
            "535.104.05",
        ),
        ("", None),
        ("NVRM version: unknown\n", None),
    ],
)
def test_driver_version_from_banner(banner: str, version: str | None) -> None:
    assert parse_nvidia_driver(banner) == version
