"""Settings: one attrs record built from the environment and the original's env files.

Precedence (highest first), as the original server had it: the process environment, `.env`,
`config/payment.env`, `config/llamacpp.env`, then the built-in default. Relative paths in files and
values are resolved against the directory the server runs in (`root`).

Every problem is reported at once, each naming the variable, the bad value, where it came from and
what to do about it, so a misconfigured server never starts half-way.

Modules: `parse` (one value's text to a value), `show` (printing values, secrets masked), `schema`
(the `Settings` record), `secret` (the generated development JWT secret), `checks` (rules across
variables and the files they name), `load` (the layers and `load_settings`).
"""

from .load import ENV_FILES, load_settings
from .parse import SettingsError
from .schema import DEFAULT_TEMPLATE_FILE, Settings, default_model_path, setting_fields
from .secret import JWT_SECRET_FILE, ensure_jwt_secret

__all__ = [
    "DEFAULT_TEMPLATE_FILE",
    "ENV_FILES",
    "JWT_SECRET_FILE",
    "Settings",
    "SettingsError",
    "default_model_path",
    "ensure_jwt_secret",
    "load_settings",
    "setting_fields",
]
