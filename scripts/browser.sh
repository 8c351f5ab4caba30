#!/usr/bin/env bash
# Install headless Chromium (Debian's package) for the end-to-end browser test, unless it is already there.
# The test drives it with Playwright's Python package (from the dev extra), never with a downloaded browser build.
# Without apt-get or root the test is skipped with the reason, so that is not a failure here.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
bash "$(dirname "$0")/debian_package.sh" browser.sh "Chromium as /usr/bin/chromium to run the browser test" \
    chromium || [ $? = 3 ]
