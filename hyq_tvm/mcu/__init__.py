"""Microcontrollers: boards, the integer graph as C with a static memory plan, firmware builds and emulated runs."""
