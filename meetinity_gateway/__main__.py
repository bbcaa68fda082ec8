from meetinity_gateway.cli import main

raise SystemExit(main())
