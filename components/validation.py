"""Checked configuration sections: pydantic dataclasses that refuse unknown keys and bad
values, and one line per problem naming the key (shared by the pipeline's and the Trainer's
config; no TensorFlow)."""
from __future__ import annotations

from typing import Annotated

import pydantic
import pydantic.dataclasses

from carvision.components.errors import UserError

ConfigError = UserError  # a configuration or command-line value; the message names it
SECRET_KEYS = ('dsn',)   # their values are never echoed in an error

# Every section is a pydantic dataclass: values are checked (types, ranges, choices) when a
# config is built or a field is assigned, and unknown keys are errors. One source of defaults.
STRICT = pydantic.ConfigDict(extra='forbid', validate_assignment=True)
Fraction = Annotated[float, pydantic.Field(ge=0.0, le=1.0)]
Positive = Annotated[int, pydantic.Field(gt=0)]
NonNegative = Annotated[int, pydantic.Field(ge=0)]
Seconds = Annotated[float, pydantic.Field(gt=0.0)]
PositiveFloat = Annotated[float, pydantic.Field(gt=0.0)]


def one_of(values):
  def check(v):
    if v not in values:
      raise ValueError(f'one of {", ".join(values)}')
    return v
  return pydantic.AfterValidator(check)


def check(fn):
  """A plain check (raising ValueError) as a pydantic validator."""
  def run(v):
    if v is not None:
      fn(v)
    return v
  return pydantic.AfterValidator(run)


def where(loc) -> str:
  """pydantic's error location (('model', 'stages', 0, 'epochs')) as a dotted key."""
  out = ''
  for part in loc:
    if isinstance(part, int):
      out += f'[{part}]'
    elif not str(part).startswith('function-'):
      out += ('.' if out else '') + str(part)
  return out


def explain(e: pydantic.ValidationError, prefix: str = '') -> ConfigError:
  """One line per problem: the key, the value given and what is allowed."""
  lines = []
  for err in e.errors():
    msg = err['msg'].removeprefix('Value error, ')
    key = '.'.join(p for p in (prefix, where(err['loc'])) if p)
    value = '=<hidden>' if key.split('.')[-1] in SECRET_KEYS else f"={err.get('input')!r}"
    if err['type'] == 'unexpected_keyword_argument':
      lines.append(f'{key}: unknown key')
    elif err['type'] == 'dataclass_type':
      lines.append(f'{key}{value}: a section (a mapping of keys)')
    elif msg.startswith(key):  # our own checks name the key already
      lines.append(msg)
    else:
      lines.append(f'{key}{value}: {msg}')
  return ConfigError('; '.join(lines) or str(e))
