from vramcal.cli import main

raise SystemExit(main())
