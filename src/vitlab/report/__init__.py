"""The report: figures and one self-contained HTML page arranged from analysis results."""
