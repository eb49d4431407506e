"""The agents of the labelled tool-use set: three tool sets, built the SDK way.

``demo`` is rtagent's own demo agent (one slow tool); ``shop`` has two tools on the same kind of
argument (an order id); ``helper`` has two unrelated tools, one with an enum argument. The tools
are never run by the evaluation: only the model's choice of call and arguments is scored.
"""

from __future__ import annotations

from typing import Any, Literal

from agents import Agent, function_tool

from rtagent.demo import agent as demo_agent


@function_tool
def get_order_status(order_id: str) -> str:
    """Get the shipping status of a customer's order.

    Args:
        order_id: The order number, e.g. A1234.
    """
    return f"Order {order_id} shipped yesterday."


@function_tool
def cancel_order(order_id: str, reason: str) -> str:
    """Cancel a customer's order.

    Args:
        order_id: The order number.
        reason: Why the customer wants to cancel.
    """
    return f"Order {order_id} cancelled."


@function_tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return the exact result.

    Args:
        expression: The arithmetic expression, e.g. 3 * (4 + 5).
    """
    return "42"


@function_tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Get the current weather for a city.

    Args:
        city: The city name.
        unit: Temperature unit.
    """
    return f"Sunny in {city}."


AGENTS: dict[str, Agent[Any]] = {
    "demo": demo_agent,
    "shop": Agent(
        name="ShopAssistant",
        instructions="You are the customer service assistant of an online shop. Be brief and friendly.",
        tools=[get_order_status, cancel_order],
    ),
    "helper": Agent(
        name="Helper",
        instructions=(
            "You are a helpful assistant. Use the calculator for arithmetic and the weather tool "
            "for weather questions."
        ),
        tools=[calculate, get_weather],
    ),
}
