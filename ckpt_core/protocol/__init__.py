"""The converter protocol: hook specifications, the converter and adapter base classes, the plugin
host and entry-point discovery.
"""
