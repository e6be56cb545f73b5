"""Tools that chat and evaluation run: XTuner's built-in plugins and a user's own module.

- ``calculate(expression)``: arithmetic by a walk over Python's AST (never ``eval``): numbers,
  ``+ - * / // % **`` (``^`` too, as XTuner reads it), parentheses and a few ``math`` functions.
  Integers and fractions stay exact; a whole result is written without a decimal point
  (``42``, not ``42.0``).
- ``solve(equation)``: sympy solves an equation (``x^2 - 4 = 0``) or a system separated by ``;``,
  the text read by the same AST walk, so sympy never ``eval``s it.
- ``--tools FILE``: every public function defined in the module becomes a tool; its schema is what
  ``transformers.utils.get_json_schema`` reads from its type hints and docstring.

XTuner's ``search`` needs a network and is not built in; supply it through a module. A call to an
unknown tool, or with arguments that do not fit the schema, and a tool that raises, give an
``error: ...`` result that goes back to the model rather than stopping the conversation.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from tunemake.errors import TunemakeError


class ToolError(TunemakeError):
    """A tool module or a plugin name that cannot be used."""


# --- calculate -----------------------------------------------------------------------------------
# The docstrings below are what a model is shown (``get_json_schema``): short, as every token of
# a tool's description is in every prompt that offers it.

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial}
_EXACT = ("abs", "round", "min", "max", "floor", "ceil")
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 10_000  # 10 ** 10 ** 10 would not finish


def _parse(text: str) -> ast.expr:
    try:
        return ast.parse(text.replace("^", "**").strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot read {text!r} as arithmetic") from None


def _number(node: ast.expr):
    """The value of an arithmetic AST: ints and Fractions stay exact, anything else is a float."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(node.value) if isinstance(node.value, int) else Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise ValueError("exponent too large")
            if isinstance(right, Fraction) and right.denominator != 1:
                return float(left) ** float(right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_number(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        return _function(node.func.id, [_number(arg) for arg in node.args])
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")


def _function(name: str, values: list):
    if name in _EXACT:  # exact on fractions; math.floor / ceil of a Fraction is an int
        result = _FUNCTIONS[name](*values)
    elif name == "factorial":
        if len(values) != 1 or values[0] != int(values[0]) or not 0 <= values[0] <= 1000:
            raise ValueError("factorial takes one whole number from 0 to 1000")
        result = math.factorial(int(values[0]))
    else:
        result = _FUNCTIONS[name](*(float(v) for v in values))
    return Fraction(result) if isinstance(result, int) else result


def format_number(value) -> str:
    """``42`` for a whole number, the shortest float text otherwise (``3.5``, ``0.3333333333333333``)."""
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else repr(float(value))
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def calculate(expression: str) -> str:
    """Evaluate arithmetic.

    Args:
        expression: arithmetic with + - * / ** and parentheses
    """
    return format_number(_number(_parse(expression)))


# --- solve --------------------------------------------------------------------------------------


def _sympy(node: ast.expr, symbols: dict):
    import sympy

    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Rational(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY and not isinstance(node.op, (ast.FloorDiv, ast.Mod)):
        right = _sympy(node.right, symbols)
        if isinstance(node.op, ast.Pow) and right.is_number and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](_sympy(node.left, symbols), right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_sympy(node.operand, symbols))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return {"pi": sympy.pi, "e": sympy.E}[node.id]
        return symbols.setdefault(node.id, sympy.Symbol(node.id))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        functions = {"sqrt": sympy.sqrt, "log": sympy.log, "exp": sympy.exp, "sin": sympy.sin,
                     "cos": sympy.cos, "tan": sympy.tan, "abs": sympy.Abs}
        if node.func.id in functions:
            return functions[node.func.id](*[_sympy(arg, symbols) for arg in node.args])
    raise ValueError(f"not an equation term: {ast.unparse(node)!r}")


def solve(equation: str) -> str:
    """Solve equations for their unknowns.

    Args:
        equation: like x^2 = 4; several separated by ;
    """
    import sympy

    symbols: dict = {}
    equations = []
    for part in (p for p in equation.split(";") if p.strip()):
        sides = part.split("=")
        if len(sides) > 2:
            raise ValueError(f"one '=' per equation: {part.strip()!r}")
        left = _sympy(_parse(sides[0]), symbols)
        right = _sympy(_parse(sides[1]), symbols) if len(sides) == 2 else sympy.Integer(0)
        equations.append(sympy.Eq(left, right))
    if not equations or not symbols:
        raise ValueError("no unknown to solve for")
    unknowns = [symbols[name] for name in sorted(symbols)]
    solutions = sympy.solve(equations, unknowns, dict=True)
    if not solutions:
        return "no solution"
    return "; ".join(", ".join(f"{name} = {value}" for name, value in sorted((str(k), v) for k, v in s.items()))
                     for s in solutions)


#: XTuner's ``--with-plugins`` names that are built in, and the call names XTuner's parser
#: accepts for each.
PLUGINS: dict[str, Callable[..., str]] = {"calculate": calculate, "solve": solve}
ALIASES = {"calculator": "calculate", "solver": "solve"}


# --- the toolbox ----------------------------------------------------------------------------------


@dataclass
class Toolbox:
    """The tools a conversation offers: their schemas (what the template shows the model) and the
    functions that run a call."""

    functions: dict[str, Callable] = field(default_factory=dict)
    schemas: list[dict] = field(default_factory=list)

    def add(self, function: Callable, origin: str) -> None:
        """Offer ``function`` under its own name, its schema read from its hints and docstring.

        Raises:
            ToolError: the function has no docstring or type hints transformers can read.
        """
        from transformers.utils import get_json_schema

        try:
            schema = get_json_schema(function)
        except Exception as exc:  # DocstringParsingException, TypeHintParsingException
            raise ToolError(f"{origin}: {function.__name__}: cannot describe it as a tool ({exc}); give it "
                            "type hints and a Google-style docstring with an Args: section") from None
        self.functions[function.__name__] = function
        self.schemas = [s for s in self.schemas if s["function"]["name"] != function.__name__] + [schema]

    def resolve(self, name: str) -> str | None:
        """The offered tool a call's name means: the name itself, in any case, or XTuner's alias."""
        if name in self.functions:
            return name
        lowered = {n.lower(): n for n in self.functions}
        return lowered.get(name.lower()) or lowered.get(ALIASES.get(name.lower(), ""))

    def run(self, call: dict) -> str:
        """Run one ``{"name", "arguments"}`` call; any failure is an ``error: ...`` result."""
        from tunemake.toolforms import bind_arguments

        call = bind_arguments(call, self.schemas)
        if call.get("error"):
            return f"error: {call['error']}"
        name = self.resolve(call["name"])
        if name is None:
            return f"error: unknown tool {call['name']!r}; the tools are {', '.join(self.functions)}"
        problem = _argument_problem(call.get("arguments"), self._schema(name))
        if problem:
            return f"error: {name}: {problem}"
        try:
            result = self.functions[name](**call["arguments"])
        except Exception as exc:  # the model's arguments may make any tool fail: the model hears why
            return f"error: {name}: {exc}"
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)

    def _schema(self, name: str) -> dict:
        return next(s["function"] for s in self.schemas if s["function"]["name"] == name)


_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def _argument_problem(arguments, schema: dict) -> str | None:
    """Why ``arguments`` do not fit the function's JSON schema (names, required, basic types)."""
    if not isinstance(arguments, dict):
        return "arguments should be a JSON object"
    properties = (schema.get("parameters") or {}).get("properties") or {}
    for key in arguments:
        if key not in properties:
            return f"unknown argument {key!r}; arguments: {', '.join(properties) or 'none'}"
    for key in (schema.get("parameters") or {}).get("required") or []:
        if key not in arguments:
            return f"missing argument {key!r}"
    for key, value in arguments.items():
        expected = _JSON_TYPES.get(properties[key].get("type"))
        if expected and (not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))):
            return f"argument {key!r} should be {properties[key]['type']}, got {type(value).__name__}"
    return None


def load_toolbox(plugins=(), module: str | None = None) -> Toolbox:
    """The tools of ``--with-plugins`` names and of a ``--tools`` module file.

    Raises:
        ToolError: an unknown plugin (``search`` included: it needs a network), a module that
            cannot be imported, or one with no public function.
    """
    toolbox = Toolbox()
    for name in plugins:
        if name not in PLUGINS:
            hint = "; search needs a network: write it in a --tools module" if name == "search" else ""
            raise ToolError(f"--with-plugins: unknown plugin {name!r}; built in: {', '.join(PLUGINS)}{hint}")
        toolbox.add(PLUGINS[name], "tunemake.toolbox")
    if module:
        for function in _module_functions(module):
            toolbox.add(function, module)
    return toolbox


def _module_functions(path: str) -> list[Callable]:
    file = Path(path)
    if not file.is_file():
        raise ToolError(f"{path}: no such tool module")
    spec = importlib.util.spec_from_file_location(f"tunemake_tools_{file.stem}", file)
    loaded = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(loaded)
    except Exception as exc:  # the user's module: any error, reported in one line
        raise ToolError(f"{path}: cannot import the tool module ({type(exc).__name__}: {exc})") from None
    functions = [f for name, f in inspect.getmembers(loaded, inspect.isfunction)
                 if not name.startswith("_") and f.__module__ == loaded.__name__]
    if not functions:
        raise ToolError(f"{path}: defines no public function to offer as a tool")
    return sorted(functions, key=lambda f: inspect.getsourcelines(f)[1])
