"""tuner's page, one module per tab: each builds its components (returned by name) and wires their events.

    from tuner.ui.page import build_demo
    build_demo().launch()
"""
