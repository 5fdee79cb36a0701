"""The forwarding engine's new settings fail at parse time naming the variable."""

import pytest
from defender_servicenow import settings
from defender_servicenow.exceptions import ConfigError


@pytest.mark.parametrize("func, name", [
    (settings.alert_reconcile_hours, "DEFENDER_ALERT_RECONCILE_HOURS"),
    (settings.servicenow_auth_cooldown_minutes, "SERVICENOW_AUTH_COOLDOWN_MINUTES"),
    (settings.defender_auth_cooldown_minutes, "DEFENDER_AUTH_COOLDOWN_MINUTES"),
])
def test_new_settings_are_validated(func, name):
    assert func({}) in (24.0, 30.0)
    assert func({name: "2"}) == 2.0
    for bad in ("soon", "0", "100000"):
        with pytest.raises(ConfigError, match=name):
            func({name: bad})
