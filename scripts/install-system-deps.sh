#!/usr/bin/env bash
# Installs what the tests need beyond pip. Nothing yet; the report test adds Chromium here.
set -euo pipefail
