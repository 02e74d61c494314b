from typing import Any

constexpr: Any
float32: Any
float16: Any
bfloat16: Any
int32: Any
int64: Any

def __getattr__(name: str) -> Any: ...
