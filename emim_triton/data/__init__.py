"""Video datasets: annotation formats, readers (PyAV, frame folders), clip sampling and transforms."""
