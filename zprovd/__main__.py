from zprovd.cli import main

raise SystemExit(main())
