"""What kallm's tests, its benchmarks and users' own tests share: the textbook reference KAN (``reference``)."""
