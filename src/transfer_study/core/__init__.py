"""What every stage imports: params, paths, atomic writes, one-line errors, timing, markers."""
