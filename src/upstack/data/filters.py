"""Row filters: a tiny expression language, parsed with `ast` and walked by hand (nothing is eval'd).

See docs/data.md (filter syntax). `compile_filter` checks an expression once and returns a predicate
`(row, row_number) -> bool`.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable

from upstack.data.formats import json_type
from upstack.errors import ConfigError, DataError

FILTER_HELP = ("filters are 'FIELD=VALUE' or an expression of fields, constants ('text', 42, True, None),"
               " len(FIELD), lower(FIELD), _row (the row number), comparisons (== != < <= > >= in, not in),"
               " and, or, not, and tuples/lists of constants")
_FIELD_EQUALS = re.compile(r"\s*([A-Za-z_]\w*)\s*=(?!=)\s*(.*?)\s*", re.S)
_FUNCS: dict[str, Callable[[Any], Any]] = {"len": len, "lower": str.lower}
_OPS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
        ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
        ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
MAX_DEPTH = 100  # checking and evaluating recurse once per level; a real filter nests a handful of levels
_OP_TEXT = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in"}


def compile_filter(text: str) -> Callable[[dict, int], bool]:
    """A filter expression -> predicate(row, row_number). ConfigError for anything outside the grammar."""
    if len(text) > 2000:
        raise ConfigError("filter: longer than 2000 characters")
    m = _FIELD_EQUALS.fullmatch(text)
    if m:
        name, wanted = m.group(1), unquote(m.group(2))

        def equals(row: dict, n: int) -> bool:
            return _as_text(_lookup(name, row, n, text)) == wanted
        return equals
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"filter {text!r}: not a valid expression ({e.msg}); {FILTER_HELP}") from None
    except (RecursionError, MemoryError):  # Python's own parser gives up on very deep nesting
        raise ConfigError(f"filter {_short(text)}: nests deeper than {MAX_DEPTH} levels") from None
    _check_depth(tree, text)
    _check_node(tree, text)

    def predicate(row: dict, n: int) -> bool:
        return bool(_eval(tree, row, n, text))
    return predicate


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text)} characters)"


def _check_depth(tree: ast.AST, text: str) -> None:
    """Bound the nesting before anything recurses over the tree (checks, messages, evaluation)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"filter {_short(text)}: nests deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr))


def _check_node(node: ast.AST, text: str) -> None:
    ok = False
    if isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        ok = True
    elif isinstance(node, ast.Compare):
        ok = all(type(op) in _OPS for op in node.ops)
    elif isinstance(node, ast.Name):
        ok = True
    elif isinstance(node, ast.Constant):
        ok = node.value is None or isinstance(node.value, (str, int, float, bool))
    elif isinstance(node, (ast.Tuple, ast.List)):
        ok = all(isinstance(e, ast.Constant) for e in node.elts)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        ok = isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
    elif isinstance(node, ast.Call):
        ok = (isinstance(node.func, ast.Name) and node.func.id in _FUNCS and len(node.args) == 1
              and not node.keywords and not isinstance(node.args[0], ast.Starred))
        if ok:
            _check_node(node.args[0], text)
            return
    if not ok:
        raise ConfigError(f"filter {text!r}: {ast.unparse(node)!r} is not allowed; {FILTER_HELP}")
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.expr_context, ast.boolop, ast.cmpop, ast.unaryop)):
            _check_node(child, text)


def _lookup(name: str, row: dict, n: int, text: str) -> Any:
    if name == "_row":
        return n
    if name not in row:
        raise DataError(f"filter {text!r}: field '{name}' is missing")
    return row[name]


def _eval(node: ast.AST, row: dict, n: int, text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _lookup(node.id, row, n, text)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(e.value for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, row, n, text)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, row, n, text) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Call):
        arg = _eval(node.args[0], row, n, text)
        name = node.func.id
        if (name == "len" and not isinstance(arg, (str, list, dict))) or (name == "lower" and not isinstance(arg, str)):
            raise DataError(f"filter {text!r}: {name}() cannot take a {json_type(arg)}")
        return _FUNCS[name](arg)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, row, n, text)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, row, n, text)
            try:
                if not _OPS[type(op)](left, right):
                    return False
            except TypeError:
                raise DataError(f"filter {text!r}: cannot apply '{_OP_TEXT[type(op)]}' to a"
                                f" {json_type(left)} and a {json_type(right)}") from None
            left = right
        return True
    raise AssertionError(f"unchecked filter node {ast.dump(node)}")  # _check_node rejects these


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)



def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" and value[0] not in value[1:-1]:
        return value[1:-1]
    return value

